"""Share groups (KIP-932, "Queues for Kafka"): the wire format and a share consumer.

The worker's ``processing_mode="share"`` takes its task records through them
(docs/share-groups.md).
"""
