"""The data layer, used by every stage: image sources, the shard writer (`selfsup shard`), the manifest, and
the reader that streams shards back in equal batches per rank."""
