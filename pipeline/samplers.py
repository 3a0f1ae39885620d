"""The samplers of each objective, listed once: config validation (pipeline/config.py), the CLI's help
(stages/cli.py) and the objectives' dispatch (pipeline/diffusion.py) all read this table. A new sampler is one line
here, naming the objective's method that runs it (written in pipeline/diffusion.py). Torch-free: the config and
`ditpipe --help` import it without torch."""

# objective -> {sampler name: the objective's method that runs the whole loop}, its default sampler first
SAMPLERS = {
    "ddpm": {"ddpm": "p_sample_loop", "ddim": "ddim_sample_loop"},
    "flow": {"euler": "euler_sample", "heun": "heun_sample"},
}
NAMES = tuple(name for loops in SAMPLERS.values() for name in loops)  # every objective's, in the table's order
