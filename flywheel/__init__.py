"""The composition root: the `rlhf` command, the one-machine launcher, the offline bootstrap and the demo.

It may import everything below it (services/, shared/); nothing below imports it (see the import
contracts in pyproject.toml)."""
