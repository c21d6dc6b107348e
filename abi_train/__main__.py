from abi_train.cli import main

main()
