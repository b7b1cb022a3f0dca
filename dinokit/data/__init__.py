"""Data: HAR readers, the fixed split, the embedded dataset, multi-crop and iBOT masks."""
