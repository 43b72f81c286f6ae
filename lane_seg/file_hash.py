"""SHA-256 of a file in 1 MiB blocks: model identity, checkpoint integrity, engine cache keys."""

import hashlib


def file_sha256(path) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()
