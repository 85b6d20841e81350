"""`python -m tests.support.powerloss MOUNT BACKING --control SOCKET` (see server.py)."""

from tests.support.powerloss.server import main

main()
