"""The `heygem-ops` command line: one safe, tested command per step of the old runbook.

Commands are imported lazily, so `heygem-ops zombies` does not pay for onnxruntime or cv2.
"""
