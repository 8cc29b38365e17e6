"""What a run shows and keeps: progress and tables, history.jsonl, trackers, plots, the output folder."""
