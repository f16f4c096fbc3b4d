"""The engine suite's core cases (submit, run, stream, cancel, status) over SASL_SSL with SCRAM."""

import pytest

from tests.engine_suite import (
    test_a_task_handle_gives_the_result_the_stream_the_status_and_cancel,
    test_add_task_with_timeout_returns_the_finished_task,
    test_app_cancel_stops_a_running_task,
    test_bad_records_go_to_the_dead_letter_topic_and_the_worker_goes_on,
    test_client_without_a_worker_sees_what_a_worker_app_does,
    test_each_value_reaches_the_stream_while_the_task_still_runs,
    test_generator_values_stream_in_order_and_returning_lists_them,
    test_retry_builds_a_chain_and_retries_subclasses,
    test_sync_function_and_sync_generator_run_in_threads,
    test_unknown_task_ends_as_error_and_the_worker_keeps_serving,
)

# the first of these waits for the session's secure broker to start (certificates, ACL grants)
pytestmark = pytest.mark.timeout(300)

__all__ = [
    "test_a_task_handle_gives_the_result_the_stream_the_status_and_cancel",
    "test_add_task_with_timeout_returns_the_finished_task",
    "test_app_cancel_stops_a_running_task",
    "test_bad_records_go_to_the_dead_letter_topic_and_the_worker_goes_on",
    "test_client_without_a_worker_sees_what_a_worker_app_does",
    "test_each_value_reaches_the_stream_while_the_task_still_runs",
    "test_generator_values_stream_in_order_and_returning_lists_them",
    "test_retry_builds_a_chain_and_retries_subclasses",
    "test_sync_function_and_sync_generator_run_in_threads",
    "test_unknown_task_ends_as_error_and_the_worker_keeps_serving",
]
