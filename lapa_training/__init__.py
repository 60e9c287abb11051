"""Training side of lapa-ros: datasets from rosbags, the LAQ model, the VLA, training loops, evaluation."""
