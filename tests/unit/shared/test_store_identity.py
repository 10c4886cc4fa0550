"""A store's id is created once and read the same ever after; a file that holds no id is an error."""

import pytest

from shared.store_identity import ID_FILE, StoreIdentityError, identity_of, read_identity


def test_the_id_is_created_once_and_kept(tmp_path):
    root = tmp_path / "models"
    assert read_identity(root) is None
    first = identity_of(root)
    assert len(first) == 32 and int(first, 16) >= 0
    assert identity_of(root) == first == read_identity(root)
    assert identity_of(tmp_path / "other") != first, "each store gets its own id"
    assert [p.name for p in root.iterdir()] == [ID_FILE], "no temp file is left behind"


def test_an_id_written_by_another_process_wins(tmp_path):
    (tmp_path / ID_FILE).write_text("ab" * 16 + "\n")
    assert identity_of(tmp_path) == "ab" * 16


def test_a_file_that_holds_no_id_is_refused_with_its_path(tmp_path):
    (tmp_path / ID_FILE).write_text("not an id")
    with pytest.raises(StoreIdentityError, match="store-id does not hold a store id"):
        identity_of(tmp_path)
