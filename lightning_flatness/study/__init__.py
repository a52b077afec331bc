"""The batch-size study, an application of the library: ``lightning-flatness sweep`` trains a
model at several batch sizes (or learning rates) to the same training loss with
:class:`~lightning_flatness.FlatnessCallback` (:mod:`.sweep`, :mod:`.training`, :mod:`.data`), and
``lightning-flatness report`` compares the runs (:mod:`.runs`, :mod:`.report`, :mod:`.plots`).
The command line is :mod:`.cli`."""
