"""The whole pipeline: the stages in data-flow order (`stages`), the loop that runs them (`loop`), and the
report over all of them (`report`, with its settings in `config`). See docs/pipeline.md."""
