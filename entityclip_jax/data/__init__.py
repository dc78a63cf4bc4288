"""Raw datasets, tokenizer, TFRecords and the tf.data pipeline; the explanation cache file format."""
