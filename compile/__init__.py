"""Edge TPU compile stage: pre-flight mapper (``mapper``), ``edgetpu_compiler`` wrapper
(``compiler``), log parser (``logparse``) and the ``check`` / ``compile`` CLI (``cli``)."""
