"""A study: its folder and run-name grammar (``folder``), what it found (``findings``), where runs
execute (``executors``), the runner (``runner``), the model card and What ran box (``report``) and
the book (``book``)."""
