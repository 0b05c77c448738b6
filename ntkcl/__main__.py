from ntkcl.cli import main

main()
