"""The test tree is a package, so every suite imports shared helpers as `tests.support...`."""
