"""Parsing edgetpu_compiler's console summary and operation log (fixtures in its format)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemma_edge.compile.logparse import parse_compiler_output, parse_operation_log, parse_size

FIXTURES = Path(__file__).parent / "fixtures" / "edgetpu"


def _log(name: str):
    return parse_compiler_output((FIXTURES / name).read_text())


@pytest.mark.parametrize("text,expected", [("7.88MiB", round(7.88 * 2**20)), ("0.00B", 0),
                                           ("66.00KiB", 66 * 1024), ("1.5GiB", 3 * 2**29),
                                           ("n/a", None)])
def test_sizes(text: str, expected) -> None:
    assert parse_size(text) == expected


def test_fully_mapped_summary() -> None:
    log = _log("full_mapped.txt")
    assert log.ok and log.succeeded and log.compiler_version == "16.0.384591198"
    assert log.timeout_timer_s == 180
    (m,) = log.models
    assert m.input_model == "encoder_edgetpu_64.tflite" and m.compile_ms == 812
    assert m.output_model == "encoder_edgetpu_64_edgetpu.tflite" and m.segment is None
    assert (m.on_chip_used, m.off_chip_streamed) == (round(5.02 * 2**20), 0)
    assert (m.edgetpu_subgraphs, m.total_ops, m.operation_log) == (
        1, 31, "encoder_edgetpu_64_edgetpu.log")
    assert m.all_mapped and sum(r.count for r in m.rows) == 31


def test_every_status_and_several_rows_per_operator() -> None:
    (m,) = _log("partial.txt").models
    assert (m.tpu_ops, m.cpu_ops) == (8, 32) and not m.all_mapped
    counts = m.mapped_counts()
    assert counts["QUANTIZE"] == {"tpu": 2, "cpu": 1}
    assert counts["ADD"] == {"tpu": 1, "cpu": 4} and counts["MUL"] == {"tpu": 3, "cpu": 5}
    statuses = {r.status for r in m.rows}
    assert statuses == {
        "Mapped to Edge TPU",
        "Operation is otherwise supported, but not mapped due to some unspecified limitation",
        "More than one subgraph is not supported", "Operation not supported",
        "Tensor has unsupported rank (up to 3 innermost dimensions mapped)",
        "Operation is working on an unsupported data type", "Operation version not supported",
        "Unsupported data type"}
    assert sum(r.count for r in m.rows if r.mapped) == m.tpu_ops
    assert sum(r.count for r in m.rows) == m.total_ops == 40


def test_table_only_in_the_operation_log() -> None:
    (m,) = _log("partial_see_log.txt").models
    assert not m.rows and not m.rows_complete and m.cpu_ops == 7
    oplog = parse_operation_log((FIXTURES / "partial_see_log_edgetpu.log").read_text())
    assert oplog.input_model == "encoder_edgetpu_128.tflite"
    assert oplog.output_model == "encoder_edgetpu_128_edgetpu.tflite"
    assert sum(r.count for r in oplog.rows if r.mapped) == m.tpu_ops == 5
    assert sum(r.count for r in oplog.rows if not r.mapped) == 7


def test_only_cpu_rows_listed() -> None:
    (m,) = _log("all_other_mapped.txt").models
    assert not m.rows_complete and [r.op for r in m.rows] == [
        "RESHAPE", "CONCATENATION", "QUANTIZE"]
    assert (m.tpu_ops, m.cpu_ops, m.off_chip_streamed) == (138, 3, round(6.63 * 2**20))


def test_cocompiled_models() -> None:
    log = _log("cocompiled.txt")
    assert log.ok and [m.output_model for m in log.models] == [
        "encoder_edgetpu_64_edgetpu.tflite", "encoder_edgetpu_128_edgetpu.tflite"]
    first, second = log.models
    assert first.compile_ms == second.compile_ms == 1830
    assert first.on_chip_used > 0 and second.on_chip_used == 0  # the first model gets the cache
    assert first.all_mapped and not second.all_mapped


def test_segmented_outputs() -> None:
    log = _log("segmented.txt")
    assert log.ok and [m.segment for m in log.models] == [(0, 2), (1, 2)]
    assert log.warnings[0].startswith("For the given model, you're creating more segments")
    assert [m.compile_ms for m in log.models] == [900, 870]


@pytest.mark.parametrize("name,kind,detail", [
    ("fail_not_quantized.txt", "not_quantized", "Model not quantized"),
    ("fail_internal_error.txt", "internal_error", "Internal compiler error. Aborting!"),
    ("fail_unknown_opcode.txt", "unknown_opcode",
     "Didn't find op for builtin opcode 'GELU' version '1'"),
    ("fail_large_activations.txt", "compilation_failed",
     "Compilation failed: Compilation failed due to large activation tensors in model."),
    ("fail_unresolved_custom_op.txt", "unresolved_custom_op",
     "Encountered unresolved custom op: Atan"),
])
def test_failures(name: str, kind: str, detail: str) -> None:
    log = _log(name)
    assert not log.ok and log.failure == kind and log.failure_detail == detail
    assert not log.models


def test_failure_errors_are_collected() -> None:
    log = _log("fail_unknown_opcode.txt")
    assert log.errors[-1] == "Registration failed." and log.succeeded is None


def test_old_compiler_without_table_header_fields() -> None:
    (m,) = _log("old_compiler_2_0.txt").models
    assert _log("old_compiler_2_0.txt").compiler_version == "2.0.267685300"
    assert (m.edgetpu_subgraphs, m.tpu_ops, m.cpu_ops, m.on_chip_remaining) == (0, 0, 2, 0)


def test_unknown_lines_are_ignored() -> None:
    text = (FIXTURES / "full_mapped.txt").read_text().replace(
        "Operation log:", "Something new: 42\nOperation log:")
    assert parse_compiler_output(text).models[0].operation_log == "encoder_edgetpu_64_edgetpu.log"


def test_unwritable_output_is_named_before_the_internal_error() -> None:
    """The compiler prints its summary, then fails to write the file (issue 400 of
    google-coral/edgetpu): the cause is the output folder, not the graph."""
    log = _log("fail_output_not_writable.txt")
    assert not log.ok and log.failure == "output_not_writable"
    assert log.failure_detail == ("Error opening file for writing: build/artifacts/edgetpu/"
                                  ".edgetpu-compile-x1/attn_32_00_edgetpu.tflite")
