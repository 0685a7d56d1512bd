"""Every figure the package draws, one module per script, all in one style (:mod:`.style`):
:mod:`.plateaus` (experiments.plateaus), :mod:`.jacobians` (experiments.jacobians),
:mod:`.sweep` (the sweep report), :mod:`.emergence`, :mod:`.directions`, :mod:`.slices`.

Each module has ``FIGURES`` (the file names), ``BUILDERS`` (``{name: function -> Figure}``) and
``save_all`` (draws and writes them atomically)."""
