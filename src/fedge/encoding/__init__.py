"""Update encodings: clipping, quantization, compression, and the pipeline that orders them."""
