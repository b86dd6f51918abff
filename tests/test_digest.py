"""file_sha256: the one file digest (plans record their profile's, importance keys on datasets')."""

import hashlib

from fedpipe.digest import file_sha256


def test_file_sha256_matches_hashlib_across_chunks(tmp_path):
    data = bytes(range(256)) * 5000  # over one read chunk
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == file_sha256(path)
