"""Python bindings for the Container Storage Interface (CSI) spec v1.12.0.

This package is generated from proto/csi.proto by scripts/gen-csi.
Do not edit it by hand: change the proto or the script and regenerate.
"""
