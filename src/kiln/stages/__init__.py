"""One file per pipeline stage. Each `main(cfg)` is a short list of named steps."""
