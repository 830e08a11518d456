from ortq.api.cli import main

main()
