"""The object-client layer: what the filesystem core needs from S3, and two implementations.

``api`` defines the interface and its errors, ``memory`` an in-memory store for tests of
the core, ``client`` the real client (boto3 for control-plane calls, awscrt for object
data).
"""
