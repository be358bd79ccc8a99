"""Interoperability with the PyTorch world, one module per concern:

- `mixie.interop.peft`: the PEFT LoRA adapter format (tensor names, `adapter_config.json`), the writer
  and the one reader (plain LoRA and rsLoRA; DoRA and other adapter types refused by name);
- `mixie.interop.export`: a run's experts as PEFT adapters plus its router (`python -m mixie.export`);
- `mixie.interop.importer`: PEFT adapters trained elsewhere into a run's expert store
  (`python -m mixie.experts import`).
"""
