"""One module per raw source: raw files in, a dataset dir out (see `kdcli.data.coco`)."""
