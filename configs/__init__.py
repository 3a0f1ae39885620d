"""The YAML configs that ship with ditpipe, installed as `ditpipe.configs` so `--config NAME` works anywhere."""
