"""The CSI servers: identity, node and controller services over the generated `csi` package, and what they share."""
