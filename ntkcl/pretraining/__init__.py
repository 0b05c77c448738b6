"""Formula-driven images (`fractals`) and the script that pre-trained the shipped `ntkcl-tiny-fdsl` (`pretrain`)."""
