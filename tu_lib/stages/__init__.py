"""One module per notebook: its Spec, checks, steps and outputs. Stages meet only through files."""
