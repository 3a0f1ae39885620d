"""ditpipe's verbs: one module per stage, plus the typer CLI (`stages.cli`)."""
