<?php
echo_nothing_here_this_function_does_not_exist();
