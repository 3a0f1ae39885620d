"""The YAML configs that ship with ditpipe, installed as `ditpipe_configs` so `--config NAME` works anywhere."""
