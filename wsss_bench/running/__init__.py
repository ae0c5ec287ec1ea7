"""Running: one cell through its stages (runner), many cells and their shared models (bench),
the run folder's files (rundir) and the manifest's environment facts (manifest)."""
