from fedfm.cli import main

main()
