"""Share groups (KIP-932, "Queues for Kafka"): the wire format and a share consumer.

Not used by the worker yet (docs/share-groups.md says what is built and what is left).
"""
