#!/usr/bin/env bash
# Lint the operators' deployment (deploy/ansible, deploy/packer) offline; `make lint-deploy`.
#
#   deploy/check.sh           install what is missing, then lint everything
#   deploy/check.sh install   only install (tests/functional/test_ansible_engine_role.py)
#
# Installs through the project's own files only: the `deploy` extra of pyproject.toml into
# .venv (ansible-core, ansible-lint, and PyPI's `ansible` package for the amazon.aws,
# community.aws, ansible.posix and community.general collections), Debian's `packer` through
# deploy/local/installer.py. After that nothing here touches the network: ansible-lint runs
# with --offline and Packer only checks syntax. Exits non-zero on the first failing check.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
bin=$venv/bin
stamp=$venv/.installed-deploy
ansible_dir=$repo/deploy/ansible
packer_dir=$repo/deploy/packer
# Packer 1.6.6 (Debian's) has amazon-ebs and the ansible provisioner built in; a newer Packer
# needs plugins.pkr.hcl (required_plugins), which 1.6.6 cannot parse, so it is not validated.
packer_templates=(images.pkr.hcl)

step() { printf '== %s\n' "$*"; }

install() {
    if [[ ! -x $bin/python ]]; then
        echo "no $bin/python: run 'make setup' first" >&2
        exit 2
    fi
    # Reinstall when pyproject.toml changes (the extra's pins), like the Makefile's stamps.
    if [[ ! -f $stamp || $repo/pyproject.toml -nt $stamp ]]; then
        step "pip install the deploy extra into $venv"
        # Only the extra's requirements: reinstalling the project itself would rebuild Cython.
        "$bin/python" - "$repo/pyproject.toml" > "$venv/deploy-requirements.txt" <<'PY'
import sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print("\n".join(extras["deploy"]))
PY
        "$bin/pip" install -q -r "$venv/deploy-requirements.txt"
        touch "$stamp"
    fi
    (cd "$repo" && "$bin/python" -c \
        "from deploy.local.installer import ensure_debian_package as e; e('packer', 'packer'); e('promtool', 'prometheus')" \
        > /dev/null)
}

# Every role's templates rendered for every host of production and staging, with placeholder
# secrets (no AWS access), then each engine.toml loaded by the engine's own config loader and
# each prometheus.yml parsed: ansible-lint does not render templates.
render() {
    step "render production and staging configs"
    # Kept after a failure for a look (build/ is git-ignored); emptied at every run.
    local rendered=$repo/build/deploy-render inventory
    rm -rf "$rendered"
    mkdir -p "$rendered"
    for inventory in production staging; do
        "$bin/ansible-playbook" -i "inventories/$inventory" playbooks/render-configs.yml \
            -e "render_dir=$rendered/$inventory" -e "ansible_python_interpreter=$bin/python" \
            -e '{"votes_redis_password": "placeholder/password", "engine_keys": {},
                 "kafka_cluster_id": "placeholder-cluster-id",
                 "haproxy_tls_certificate_pem": "placeholder",
                 "replicator_to_redis_url": "redis://:placeholder@replica.invalid:6379/0",
                 "issuer_database_url": "postgresql://issuer:placeholder@db.invalid/votes",
                 "results_ingest_url": "http://ingest.invalid:8000",
                 "results_receipt_public_keys": "{}"}' > "$rendered/$inventory.log" 2>&1 \
            || { cat "$rendered/$inventory.log"; return 1; }
    done
    "$bin/python" - "$rendered" <<'PY'
import sys
from pathlib import Path

import yaml

from engine.config import load_config

root = Path(sys.argv[1])
configs = sorted(root.glob("*/*/engine.toml"))
if not configs:
    sys.exit("no engine.toml was rendered")
for path in configs:
    config = load_config(str(path))
    print(f"ok  {path.relative_to(root)}: node {config.node_name}, {config.shards} shards, "
          f"kafka {config.uses_kafka}, cluster {config.uses_cluster}")
# The other roles' configs: each must load, and hold what its command refuses to start without.
required = {"results.toml": ("redis_url", "results_ingest_url", "receipt_public_keys_path"),
            "issuer.toml": ("issuer_oidc_url", "issuer_oidc_audience", "issuer_database_url")}
for name, fields in required.items():
    paths = sorted(root.glob(f"*/*/{name}"))
    if not paths:
        sys.exit(f"no {name} was rendered")
    for path in paths:
        config = load_config(str(path))
        missing = [field for field in fields if not getattr(config, field)]
        if missing:
            sys.exit(f"{path}: {', '.join(missing)} empty")
        print(f"ok  {path.relative_to(root)}: port {config.port}")
for path in sorted(root.glob("*/*/prometheus.yml")):
    jobs = [job["job_name"] for job in yaml.safe_load(path.read_text())["scrape_configs"]]
    print(f"ok  {path.relative_to(root)}: jobs {', '.join(jobs)}")
PY
}

# The monitoring role's alert and SLO rules: valid, and as their promtool unit tests say.
rules() {
    local files=$repo/deploy/ansible/roles/monitoring/files
    step "promtool check rules / test rules"
    promtool check rules "$files"/rules/*.yml
    promtool test rules "$files"/rules-tests/*.test.yml
}

lint() {
    local started=$SECONDS
    cd "$ansible_dir"
    export ANSIBLE_CONFIG=$ansible_dir/ansible.cfg PATH=$bin:$PATH
    step "ansible-lint --offline --profile production"
    "$bin/ansible-lint" --offline --profile production --nocolor
    step "ansible-playbook --syntax-check"
    local playbook
    for playbook in site.yml playbooks/*.yml; do
        for inventory in inventories/*/; do
            "$bin/ansible-playbook" --syntax-check -i "$inventory" "$playbook" > /dev/null
        done
        echo "ok  $playbook"
    done
    render
    rules
    cd "$packer_dir"
    step "packer fmt -check"
    packer fmt -check .
    step "packer validate -syntax-only"
    local template
    for template in "${packer_templates[@]}"; do
        packer validate -syntax-only "$template"
    done
    # The full validate also decodes every argument (a misspelt one fails) and needs no
    # network or AWS credentials; it looks for ansible-playbook on PATH (.venv/bin).
    step "packer validate"
    for template in "${packer_templates[@]}"; do
        packer validate "$template"
        echo "ok  $template"
    done
    step "all deploy checks passed in $((SECONDS - started)) s"
}

case ${1:-all} in
    install) install ;;
    all) install; lint ;;
    *) echo "usage: $0 [install]" >&2; exit 2 ;;
esac
