"""ditpipe's library: the parts of the pipeline. Never imports `stages`."""

__version__ = "0.1.0"
