"""The runtime shield as a service: an Open Inference Protocol (KServe V2) REST proxy.

``app`` (routes and status codes), ``codec`` (V2 JSON / binary tensors), ``batcher`` (micro-batching),
``upstream`` (the model in process or on another V2 server), ``metrics`` (Prometheus).
"""

from gate.proxy.app import MODES, ProxyConfig, create_app, model_tensors

__all__ = ["MODES", "ProxyConfig", "create_app", "model_tensors"]
