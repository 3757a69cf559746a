"""The data that flows between stages: typed records (`records`), input sources in every form (`sources`),
atomic writes and folder ownership (`atomic`), resumable shards (`shards`), preference pairs (`preferences`),
dataset cards (`cards`) and training metrics logs with their plots (`metrics_log`)."""
