"""Chatty libraries stay quiet even when something resets their logger levels."""

import logging

import pytest

from shared.logging import setup_logging


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_per_request_info_lines_of_chatty_libraries_are_dropped_even_after_a_level_reset(capsys, restore_root_logger):
    setup_logging("test")
    logging.getLogger("httpx").setLevel(logging.NOTSET)  # what a library's dictConfig does
    logging.getLogger("httpx").info("HTTP Request: POST /v1/chat/completions")
    logging.getLogger("httpx").warning("connection reset")
    logging.getLogger("httpxish").info("a logger that only shares the prefix")
    logging.getLogger("services.demo").info("progress line")
    err = capsys.readouterr().err
    assert "HTTP Request" not in err
    assert "connection reset" in err and "shares the prefix" in err and "progress line" in err
