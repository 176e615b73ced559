"""The heygem-ops daemon: samples the service, decides with pure rules, heals, alerts.

Stays lean: never imports onnxruntime or cv2 (worker processes do).
"""
