"""From rosbags and videos to datasets the trainers read: bag conventions, episode writing, ingest."""
