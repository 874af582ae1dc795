"""The filter_shard step: filter, deduplicate and reshard webdataset shards with Apache Beam."""
