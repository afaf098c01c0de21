"""fedbus.serving: model serving agents that autoscale on request-rate events (not built yet).

The bus already carries what it needs: typed events, queue groups for load-shared replicas, request/reply,
the object store for model weights, and the ONNX export of :mod:`fedbus.trainer`.
"""
