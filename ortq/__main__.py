from ortq.cli import main

main()
