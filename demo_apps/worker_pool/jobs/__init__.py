"""A worker pool consuming a job queue (demo for livepatch)."""
