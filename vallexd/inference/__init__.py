"""The only package that imports torch: model, checkpoint loading, devices, engine, vocoder, EnCodec."""
