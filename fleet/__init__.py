"""edgefleet fleet: the controller that devices report to and take their desired model from.

``fleet.app.Fleet`` is the one composition root (CLI, tests); ``fleet.broker`` runs the embedded
mosquitto, ``fleet.link`` speaks MQTT, ``fleet.store`` keeps SQLite, ``fleet.api`` serves HTTP.
Nothing here imports a runtime (onnx, onnxruntime, openvino), and nothing happens at import time.
"""
