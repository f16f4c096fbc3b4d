"""Apache Kafka through aiokafka: ``kafka://host:port[,host:port][?option=value&...]``.

The only package that imports aiokafka (one module a job: ``options``, ``sizes``,
``errors``, ``health``, ``producer``, ``consumer``, ``connector``). It is thin: the engine already speaks Kafka's
shapes (topic partitions, offsets, groups), so this maps calls one to one. What it adds
is what aiokafka leaves to its caller:

- **One error edge.** Every aiokafka call goes through :func:`kafka_errors`, which turns
  any ``KafkaError`` into a :class:`~qtasks.exc.ConnectorError` subclass (pure
  :func:`map_error`, tested as a table) with aiokafka's own ``retriable`` flag.
- **Size limits read from the cluster.** At start the connector reads the broker's
  ``message.max.bytes`` and, after ``ensure_topics``, each topic's ``max.message.bytes``.
  ``send`` checks every record against them before aiokafka sees it: an idempotent
  producer whose batch the broker refuses leaves a gap in its sequence numbers (aiokafka,
  unlike the Java client, does not renumber the batches after it), so every later batch
  to that partition fails with ``OutOfOrderSequenceNumber``. A record over the limit is a
  :class:`~qtasks.exc.RecordTooLargeError` and nothing else is touched.
- **A producer that recovers.** ``flush`` reports the delivery errors of the records sent
  since the previous flush, once each. A failure that breaks the idempotent producer's
  state (a refused batch, ``OutOfOrderSequenceNumber``, ``UnknownProducerId``, a fenced
  epoch) makes it rebuild its aiokafka producer (a new producer id, sequences from 0).
- **Bounded waits.** ``start`` (and a consumer's) gives up after ``connect_timeout``
  with :class:`~qtasks.exc.BrokerUnavailableError`; a send to a topic missing from the
  cluster's metadata gives up after ``max_block`` (Java's ``max.block.ms``), and records
  already queued for a deleted topic are failed instead of being retried for
  ``request_timeout_ms``. Every call can also be cancelled by the caller's own deadline.
- **Quiet outages.** aiokafka logs every failed reconnection at ERROR. A filter on its
  loggers (:func:`install_log_filter`) turns that into one WARNING from ``qtasks.kafka``
  when the broker becomes unreachable and one INFO when it is back; the connector's
  ``reachable`` / ``unreachable_since`` say the same for health checks.
- **No busy loop in an outage.** aiokafka retries a failed metadata update as fast as
  its callers ask for one; :func:`pace_metadata_updates` makes each client wait, doubling
  from ``retry_backoff_ms`` up to a second, after an update that reached no broker.
- **New partitions are seen.** Clients refresh metadata every ``metadata_max_age``
  seconds (Kafka's default is 5 minutes), so a group consumer is assigned partitions
  added to its topics promptly; ``partitions_for(topic, refresh=True)`` asks at once.

- The producer is idempotent with ``acks=all``; ``send`` only enqueues (batched by
  ``linger_ms``), ``flush`` waits for every record.
- Consumers read raw bytes: records are decoded by the engine, never in aiokafka's
  deserializer (an exception there surfaces from ``getmany`` and wedges the partition).
- ``enable_auto_commit`` is off: the worker commits only what is done.
- Topics are created at start; an existing topic with the wrong ``cleanup.policy`` is
  a :class:`~qtasks.exc.TopicConfigError`.

URL query options: ``security_protocol`` (PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL),
``sasl_mechanism`` (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512), ``sasl_username``,
``sasl_password``, ``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile`` (also settable as
``kafka_*`` config fields), and the connector's own timings in seconds:
``connect_timeout`` (10), ``max_block`` (10), ``metadata_max_age`` (5).
"""

from qtasks.connectors.kafka.connector import KafkaConnector
from qtasks.connectors.kafka.consumer import KafkaConsumer
from qtasks.connectors.kafka.errors import is_fatal, kafka_errors, map_error
from qtasks.connectors.kafka.health import AiokafkaLogFilter, Health, install_log_filter, pace_metadata_updates
from qtasks.connectors.kafka.options import KEY_ROOM, Timings, client_options, parse_url, timings
from qtasks.connectors.kafka.producer import KafkaProducer
from qtasks.connectors.kafka.sizes import batch_size, value_limit, varint_size

__all__ = [
    "KEY_ROOM",
    "AiokafkaLogFilter",
    "Health",
    "KafkaConnector",
    "KafkaConsumer",
    "KafkaProducer",
    "Timings",
    "batch_size",
    "client_options",
    "install_log_filter",
    "is_fatal",
    "kafka_errors",
    "map_error",
    "pace_metadata_updates",
    "parse_url",
    "timings",
    "value_limit",
    "varint_size",
]
