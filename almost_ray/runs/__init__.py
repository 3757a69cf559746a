"""A run's folder, `<runs_dir>/<run_name>/`: where each stage reads and writes (`paths`), the one shape of a
stage (`stage`: check, skip when done, work, manifest), manifests (`manifest`), and `almost-ray export`."""
