"""The embedded HeyGem inference pipeline: audio + template video -> lip-synced video.

A library: it imports neither ``watchdog`` nor ``ops``. What the daemon needs to watch it
(status snapshots, heartbeats, verified providers) is exposed here.
"""

__version__ = "0.1.0"
